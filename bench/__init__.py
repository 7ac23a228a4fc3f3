"""Benchmarks of pyvirtiofsd against the Rust and C virtiofsd (`python -m bench --help`)."""
