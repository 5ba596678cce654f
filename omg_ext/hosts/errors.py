"""The error every host adapter raises for bad input the user can fix: its message is shown as is."""


class OmgUserError(ValueError):
    """Bad input the user can fix; shown as is."""
