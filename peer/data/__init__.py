"""Training data: where text comes from (files, directories, globs, ``hf:`` datasets, the embedded default corpus),
the shipped WordPiece tokenizer, and the masked-language-model batches a peer trains on. Imports only ``peer.errors``,
``peer.run`` and the leaf ``peer.store.atomic`` (the corpus cache); only ``hf:`` datasets touch the network."""
