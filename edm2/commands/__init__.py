"""The command-line layer: every click command, flag type and one-line error of the project. It sits under
the checkout's top-level scripts (thin files over these modules) and above the library: nothing else in
`edm2` imports it, so a library user never imports click."""

from edm2 import threads

threads.prepare_environment()  # before any command imports torch: waiting OpenMP threads sleep (edm2.threads)
