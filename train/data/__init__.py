"""The data path of training: pairs loaded and checked, tokenized once, planned into global batches, assembled
into length-sorted chunks (or read as streams)."""
