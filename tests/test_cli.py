"""The `aigid` executable (aigid.cli): a command is imported on first use with garbage collection off, and
`detect` ends without the interpreter's teardown."""
