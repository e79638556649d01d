"""The instance's disks: writing images, partitions, guest mounts and files, growth, export stream, URI disks."""
