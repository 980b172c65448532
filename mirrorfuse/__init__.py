"""mirrorfs client side: protocol, layout, mirrored volume and (later) the file system."""
