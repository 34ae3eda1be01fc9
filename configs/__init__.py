"""ml_collections recipes, one file per recipe; `get_config(arg)` returns the ConfigDict."""
