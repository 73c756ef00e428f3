"""Named presets (YAML) for `gptpipe --preset NAME`; shipped as package data."""
