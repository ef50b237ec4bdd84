"""Training data: where text comes from (files, directories, globs, ``hf:`` datasets, the embedded default corpus),
the shipped WordPiece tokenizer, and the masked-language-model batches a peer trains on. Imports only ``peer.errors``
and ``peer.run``; nothing here touches the network."""
