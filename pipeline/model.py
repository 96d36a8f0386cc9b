"""The embedding network: a timm backbone, global pooling, a linear head, L2-normalised output.

Trained weights travel as a ``.safetensors`` file whose metadata names the architecture
(backbone, embedding and feature dimensions), so that loading them into another architecture
fails with a message that says which one they need. Nothing here unpickles Python objects:
safetensors holds tensors only, and torch files are read with ``weights_only=True``.

Shape legend: B images, C channels, H x W pixels, F backbone features, D embedding dimension.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config.schema_train import ModelConfig
from pipeline.weights import (
    ModelLoadError,
    WeightsOrigin,
    check_finite,
    read_state_dict,
    read_trained_weights,
)


class EmbeddingModel(nn.Module):
    """``images_BCHW -> emb_BD``: backbone features, a linear head, unit L2 norm.

    With ``freeze_bn`` every BatchNorm layer keeps its running statistics and its affine
    parameters fixed (Smooth-AP's training recipe, and what makes chunked re-forwards of the
    gradient cache identical to one forward): the layers stay in eval mode whatever
    ``train()`` is called with, and their parameters do not require gradients.
    """

    weights_origin: WeightsOrigin | None = None
    """The trained weights loaded into it (:func:`load_trained_model`), else None."""

    def __init__(
        self,
        backbone: nn.Module,
        backbone_name: str,
        feature_dim: int,
        embedding_dim: int,
        freeze_bn: bool,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.backbone_name = backbone_name
        self.head = nn.Linear(feature_dim, embedding_dim)
        self.freeze_bn = freeze_bn
        if freeze_bn:
            for bn in self.batchnorm_layers():
                for p in bn.parameters():
                    p.requires_grad_(False)
        self.train()

    def batchnorm_layers(self) -> list[nn.Module]:
        # timm's BatchNormAct2d and SyncBatchNorm derive from _BatchNorm too.
        return [m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def train(self, mode: bool = True) -> EmbeddingModel:
        super().train(mode)
        if self.freeze_bn:
            for bn in self.batchnorm_layers():
                bn.eval()
        return self

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.embed_unnormalized(images_BCHW), dim=1)

    def embed_unnormalized(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """The embedding before its final L2 normalisation (``forward`` normalises this).
        Face evaluations read its norm as a quality weight (insightface's norm score)."""
        return self.head(self.backbone(images_BCHW))

    @property
    def architecture(self) -> dict[str, Any]:
        """What a weights file must match to load into this model."""
        return {
            "backbone": self.backbone_name,
            "feature_dim": self.head.in_features,
            "embedding_dim": self.head.out_features,
        }


def _create_backbone(model_cfg: ModelConfig) -> nn.Module:
    import timm  # heavy: imported when a model is built, not with the package

    name = model_cfg.backbone
    use_timm_weights = model_cfg.pretrained and not model_cfg.pretrained_path
    try:
        # num_classes=0 keeps the model's global pooling and drops its classifier.
        return timm.create_model(name, pretrained=use_timm_weights, num_classes=0)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ModelLoadError(
                f"model.backbone={name!r} is not a timm model; pick one from "
                f"timm.list_models() (e.g. 'resnet50', 'resnet18')"
            ) from e
        raise
    except Exception as e:  # no network, no cached weights, hub errors
        if not use_timm_weights:
            raise
        raise ModelLoadError(
            f"model.pretrained=true: timm could not load pretrained weights for {name!r} "
            f"({type(e).__name__}: {e}); without network access put the weights file on disk "
            "and set model.pretrained_path=FILE (or model.pretrained=false)"
        ) from e


def build_model(model_cfg: ModelConfig) -> EmbeddingModel:
    """A fresh embedding model as ``model_cfg`` describes it (weights: timm init, timm's
    pretrained weights, or ``pretrained_path`` for the backbone; the head is always new)."""
    backbone = _create_backbone(model_cfg)
    if model_cfg.pretrained_path:
        load_backbone_weights(backbone, model_cfg.pretrained_path)
    # Some timm models put a projection after pooling (MobileNetV3): its width is the output.
    feature_dim = int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)
    return EmbeddingModel(
        backbone, model_cfg.backbone, feature_dim, model_cfg.embedding_dim, model_cfg.freeze_bn
    )


# ---------------------------------------------------------------------------- reading files


def _check_shapes(
    target: dict[str, torch.Tensor], source: dict[str, torch.Tensor], what: str, fix: str
) -> None:
    wrong = [
        f"{k}: {tuple(source[k].shape)} vs {tuple(t.shape)}"
        for k, t in target.items()
        if k in source and source[k].shape != t.shape
    ]
    if wrong:
        raise ModelLoadError(
            f"{what} has {len(wrong)} tensors of other shapes (file vs model), e.g. "
            f"{'; '.join(wrong[:3])}: it was saved from another architecture; {fix}"
        )


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Load a backbone state dict (``model.pretrained_path``) into ``backbone``.

    A classifier the backbone does not have (``fc.*`` of an ImageNet checkpoint) is ignored;
    any other missing or unexpected tensor, or any shape mismatch, is an error.
    """
    state, _ = read_state_dict(path)
    check_finite(state, f"model.pretrained_path={str(path)!r}")
    own = backbone.state_dict()
    fix = "set model.backbone to the architecture it was trained with, or use its own weights"
    _check_shapes(own, state, f"model.pretrained_path={str(path)!r}", fix)
    classifier = {"fc", "head", "classifier", "last_linear", "head.fc"}
    unexpected = [k for k in state if k not in own and k.rsplit(".", 1)[0] not in classifier]
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if unexpected or missing:
        raise ModelLoadError(
            f"model.pretrained_path={str(path)!r} does not fit timm's {type(backbone).__name__}: "
            f"{len(missing)} tensors missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:3]}); {fix}"
        )
    backbone.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


# ---------------------------------------------------------------------------- trained weights


def load_trained_model(path: str | Path, model_cfg: ModelConfig | None = None) -> EmbeddingModel:
    """An ``EmbeddingModel`` with trained weights, for evaluation.

    ``path``: a ``.safetensors`` weights file written by :func:`save_weights` (a run's
    ``model.safetensors``), or a DeepSpeed checkpoint directory (root or tag) of a run. The
    architecture comes from ``model_cfg`` if given (and must match the file's, else a
    :class:`ModelLoadError` names both), otherwise from the file's metadata.
    """
    state, arch, file, origin = read_trained_weights(path)
    if model_cfg is None:
        if arch is None:
            raise ModelLoadError(
                f"{str(file)!r} does not record its architecture; pass the model config it "
                "was trained with (model.backbone, model.embedding_dim)"
            )
        model_cfg = ModelConfig(
            backbone=arch["backbone"], embedding_dim=int(arch["embedding_dim"]), freeze_bn=True
        )
    elif arch is not None and (
        arch["backbone"] != model_cfg.backbone
        or int(arch["embedding_dim"]) != model_cfg.embedding_dim
    ):
        raise ModelLoadError(
            f"{str(file)!r} holds a {arch['backbone']} model with embedding_dim="
            f"{arch['embedding_dim']}, but the config asks for model.backbone="
            f"{model_cfg.backbone!r}, model.embedding_dim={model_cfg.embedding_dim}; set "
            f"model.backbone={arch['backbone']} model.embedding_dim={arch['embedding_dim']} "
            "or pass weights of the configured model"
        )
    # No timm download and no backbone file: every tensor comes from the trained weights.
    fresh_cfg = ModelConfig(
        backbone=model_cfg.backbone,
        embedding_dim=model_cfg.embedding_dim,
        pretrained=False,
        freeze_bn=model_cfg.freeze_bn,
    )
    check_finite(state, f"weights {str(file)!r}")
    model = build_model(fresh_cfg)
    own = model.state_dict()
    fix = "evaluate with the model config of the run that wrote it"
    _check_shapes(own, state, f"weights {str(file)!r}", fix)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ModelLoadError(
            f"weights {str(file)!r} do not fit model.backbone={model_cfg.backbone!r}: "
            f"{len(missing)} tensors missing (e.g. {missing[:3]}), {len(unexpected)} "
            f"unexpected (e.g. {unexpected[:3]}); {fix}"
        )
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    # Which weights these are (identity, file or checkpoint tag, run, step): what every
    # artefact made from this model records (pipeline.weights.model_weights_record).
    model.weights_origin = origin
    return model.eval()
