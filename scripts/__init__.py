"""Scripts around the product: end-to-end workflows, load and memory tests, and the research studies (`studies`)."""
