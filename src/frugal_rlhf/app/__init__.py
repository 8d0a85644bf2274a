"""The application wing: what the command line runs (stages, pipeline, preference pairs,
evaluation, report, chat, recipes), built on the library layers below it."""
