"""pyvirtiofsd: a vhost-user virtio-fs device daemon."""

__version__ = "0.1.0"
