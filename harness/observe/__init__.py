"""What tests assert on: dmesg timelines, the PAMT model, crash classification."""
