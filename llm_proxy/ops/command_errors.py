"""The failures of an `llm-proxy` command: its exit codes and the exceptions that carry them."""

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class CommandError(Exception):
    """A command failed; str() is the one line shown to the operator."""

    exit_code = EXIT_FAILED


class UsageError(CommandError):
    """The command line or the configuration is wrong."""

    exit_code = EXIT_USAGE
