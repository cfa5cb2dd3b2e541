"""Chat with a checkpoint about an image: `python chat.py checkpoint=<dir> image=<file>` (interactive) or
`python chat.py checkpoint=<dir> image=<file> question="What is in the picture?"` (one answer). See
factory/eval/chat.py."""
import sys

from factory.eval.chat import main

if __name__ == "__main__":
    sys.exit(main())
