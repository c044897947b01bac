"""A submission whose import crashes the interpreter (SIGSEGV): graded 0, with the reason."""

import faulthandler

faulthandler._sigsegv()
