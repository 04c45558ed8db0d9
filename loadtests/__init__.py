"""Load generation and the side-by-side benchmark (`make bench`)."""
