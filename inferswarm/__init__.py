"""The `inferswarm` command: `up` runs the whole stack; client commands talk to the mesh."""
