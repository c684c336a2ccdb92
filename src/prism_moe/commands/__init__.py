"""One module per CLI command group. Each defines `register(subparsers)`, which adds its parser(s) and
sets `func(args) -> int`. Modules import heavy libraries (torch, transformers) inside `func`, so that
`prism --help` and `prism place` start fast."""
