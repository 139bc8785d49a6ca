"""Task heads on top of the SSAMNet backbone (classify, segment, detect)."""
