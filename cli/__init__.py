"""The `autoinit-tf` command line (installed as the package `autoinit_tf_cli`)."""
