"""Dense architectures (DLRM, DCNv2) on top of any table kind."""
