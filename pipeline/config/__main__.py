"""``python -m pipeline.config > pipeline/conf/defaults.yaml``: the defaults of every key."""

import yaml

from pipeline.config.runconfig import RunConfig, to_dict

if __name__ == "__main__":
    print(
        "# The defaults of every config key (generated: python -m pipeline.config > "
        "pipeline/conf/defaults.yaml).\n# Experiment files under conf/ override a subset; "
        "dotted key=value arguments override both."
    )
    print(yaml.safe_dump(to_dict(RunConfig()), sort_keys=False), end="")
