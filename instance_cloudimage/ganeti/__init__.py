"""What Ganeti gives a script: the environment, the variants, disk URIs."""
