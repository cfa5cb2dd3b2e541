"""User-facing errors.

Every bad input (malformed data, missing image, unknown component, broken checkpoint...) is reported as one
``FactoryError`` whose message is a single paragraph naming the file / sample / key and what to do about it.
Entry points (train.py, eval.py, chat.py, ``python -m factory.params``) catch it and print only the message,
never a stack trace from deep inside torch.
"""


class FactoryError(Exception):
    """An error caused by the user's input or configuration, with an actionable one-paragraph message."""
