"""The top floor: the ``earwitness`` command, which joins serving's commands and train's."""
