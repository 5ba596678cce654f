"""``modules/sd_models.py``: the adapter only asks it for Forge's ``forge_model_reload`` (Forge loads the selected
checkpoint at the first job), which A1111's has not; a Forge test sets one."""
