"""The commands that are not stages, run on a trained detector: `aigid detect` (:mod:`.detect`), `aigid app`,
`aigid score-table`, `aigid register` and `aigid promote`, and which model they score with (:mod:`.models`)."""
