"""The `sftkit` command line; installed as `sftkit_cli` so it cannot collide with other `cli` packages."""
