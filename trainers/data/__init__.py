"""The data path: image-text pairs from imagefolders, webdataset shards, `datasets` or the offline real datasets
(`pairs`, `sources`, `real_datasets`, `shards`), their fingerprint for resume checks (`fingerprint`), and batching
(`collator`)."""
