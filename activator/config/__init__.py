"""The configuration: a services file (native or Compose) in, frozen and validated objects out.

model.py declares every key once (kinds, defaults, bounds, docs) and parses; compose.py translates a Compose
document into the native one; yamlload.py is the strict YAML loader; units.py parses durations and sizes.

Pure: reads the file it is given (and a Compose file's .env and env_file) and nothing else. Imports only
activator.errors; every other package may import it.
"""
