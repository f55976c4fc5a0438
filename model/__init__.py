"""The HRNN network and its offline life. Nothing here knows about Kafka."""
