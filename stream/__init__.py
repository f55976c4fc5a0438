"""Everything that runs online: Kafka I/O, RocksDB state, the batched worker, hot swap."""
