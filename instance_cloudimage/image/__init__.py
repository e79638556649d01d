"""Image formats: detection, the header inspectors, wrappers and tar, qemu-img's second opinion."""
