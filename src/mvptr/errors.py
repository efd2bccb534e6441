"""The errors a user's input can raise, in one module that every package imports and that imports nothing.

Why: `mvptr` turns these into one line naming the key, file or id and exit status 2 (`mvptr.cli`), whichever
package raised them, and no package has to import another (the config, the data readers) for its error type.

    ConfigError   a config file, override or value that cannot be used; the message names the key
    DataError     input data that cannot be used; the message names the file, position or id
"""


class ConfigError(ValueError):
    """A config file, override or value that cannot be used; the message names the key."""


class DataError(ValueError):
    """Input data that cannot be used; the message names the file, position or id."""
