"""Datasets: token shards on disk (`shards`), tokenizing media into them (`tokenize`), and the
training loader that mixes, formats and packs them (`loader`)."""
