"""The wire: everything multifd writes to a socket or a file, as bytes.

Sans-IO codecs only (packets and hellos, the page-run table, the frames of a
compressed payload, control messages, the snapshot layout): they import the
standard library and engine.errors, nothing else, so they can be fuzzed alone and
every layer above shares one definition.
"""
