"""Shards: writing (converters, synthetic data), the catalog, validation, streaming P x K batches.

Modules (importing this package imports none of them):

- ``items``       ``SourceItem`` (what a converter lists) and the shared JPEG encoding
- ``writer``      write one split as WebDataset tar shards + ``index.parquet`` + ``sizes.json``
- ``shard_sink``  the shards being written and their catalog rows
- ``converters``  list the samples of VGGFace2, iNaturalist 2018, SOP, IJB-C, ImageFolder trees
- ``synthetic``   the built-in procedurally generated retrieval dataset
- ``catalog``     the shard table (``index.parquet``): shard naming, URL expansion,
                  ``read_index`` / ``read_sizes``
- ``outdir``      what make-shards may write where; replacing a split safely
- ``dealing``     which shards each rank and data worker reads
- ``image``       the one image path (bytes -> RGB picture -> face crop -> model input)
- ``faces``       aligned (5-point) and loose (VGGFace2) face crops
- ``storage``     local folders and ``s3://`` prefixes: the client, counted retries, reads
- ``storage_ops`` listings, checks and uploads on top of ``storage``
- ``publish``     ``make-shards --out s3://...``: upload under a temporary prefix, catalog last
- ``validate``    ``pipeline validate-shards``
- ``make_shards`` ``pipeline make-shards``
- ``parts``, ``part_records``  make-shards as N parts (a Slurm array) and their merge
- ``tarheaders``  a shard's tar headers and ``cls`` values, walked without its images
- ``pk``          class groups of K and the P x K shuffle-buffer batcher (pure logic)
- ``stream``      ``train_loader`` (P x K batches)
- ``eval_stream`` ``eval_loader`` (every eval sample once across ranks and workers)
- ``threaded``    training batches decoded by threads of the training process (default)
- ``transforms``  torchvision v2 train / eval transforms

The format is described in ``shards/README.md``.
"""
