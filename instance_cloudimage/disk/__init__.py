"""The instance's disks: writing and converting images, partitions, guest mounts and files, growth, the export stream, URI disks."""
