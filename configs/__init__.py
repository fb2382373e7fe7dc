"""The starter configs that ship with vaeflow (package data): `vaeflow init --list` names them, `vaeflow init
--template NAME` copies one, and `vaeflow config validate|train|run NAME` read one where a path is expected."""
