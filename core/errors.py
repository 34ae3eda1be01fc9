"""The one exception type for bad user input.

Anything raised as `TesseraxError` is printed by the CLI as a single line, `error: <message>`,
with a non-zero exit status and no traceback. The message names the offending thing (key,
file, directory, shape) and, where there is one, the fix.
"""


class TesseraxError(Exception):
  """Bad input or state that the user can fix; the message is one line."""
