"""The core: attaching methods to modules, adapter files, accounting and format conversion."""
