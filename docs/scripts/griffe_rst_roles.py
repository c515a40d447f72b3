"""Griffe extension for the API reference: our docstrings use a little reStructuredText
(``:func:`name```, ``:class:`~a.B```, ``Text::``); show those as Markdown code and text, as
``docgen.rst_to_markdown`` does for the model pages."""

import re

import griffe

ROLE = re.compile(r":(?:func|class|mod|meth|data|attr|obj):`~?([^`]+)`")


class RstRoles(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            text = ROLE.sub(r"`\1`", obj.docstring.value)
            obj.docstring.value = re.sub(r"::\n", ":\n", text)
