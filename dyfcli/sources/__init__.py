"""Raw sources and built-in simulators that `dyf prepare` turns into data stores, one module each."""
