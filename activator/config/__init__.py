"""The configuration: a services file (native or Compose) in, frozen and validated objects out.

Every key is declared once (kind, default, bounds, doc: declare.py's key()) on the dataclasses of service.py,
sections.py and settings.py; the kinds are kinds.py's and those of one concern (addresses.py, mounts.py,
probes.py, process.py); document.py is the whole file (Config, what relates services, the JSON Schema); parse.py
walks a document into them, collecting every problem; model.py re-exports the public names. compose.py
translates a Compose document into the native one; yamlload.py is the strict YAML loader; units.py parses
durations and sizes.

Pure: reads the file it is given (and a Compose file's .env and env_file) and nothing else. Imports only
activator.errors; every other package may import it.
"""
