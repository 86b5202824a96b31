"""Process plumbing the three daemons and the admin CLI share: config, logging, lifecycle, TLS,
durable writes, CLI error handling. Nothing here knows about disks or batches."""
