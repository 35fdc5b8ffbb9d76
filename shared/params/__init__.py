"""Stage params and recipes, one module per family of stages.

Each module exports ``STAGES`` (stage name -> ``StageInfo``) and ``RECIPES`` (recipe name ->
builder). ``shared.recipes`` merges them; the gateway and conductor validate against the
merged catalog, and a stage function decodes its own params with the same Struct.
"""
