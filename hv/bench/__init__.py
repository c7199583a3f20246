"""hv's benchmark library: links shaped as users have them (two network
namespaces joined by a veth pair, tbf on the link), and the charts the
benchmarks draw. The scripts in scripts/bench-* drive guests with it."""
