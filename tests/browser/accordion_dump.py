"""Build OMG's whole accordion (``omg_ext.ui.build``) with the gradio of the Python running
this, and print, as JSON, what the WebUI would see of each component in the order it passes
them to the Script: its kind, value, choices and infotext name. Run by ``test_accordion.py``
with the hosts' gradio versions (the test venv has no gradio), from a copy in a temporary
folder: gradio 4 writes a ``.pyi`` beside the file of any component subclass. The argument is
the repository's root; a second argument, a port, serves the accordion open on a page instead
(the screenshot in ``docs/ui/``)."""
import json
import sys

sys.path.insert(0, sys.argv[1])

import gradio as gr  # noqa: E402

from omg_ext import ui  # noqa: E402

SERVE = len(sys.argv) > 2


class EnableAccordion(gr.Checkbox):
    """Like A1111's ``InputAccordion``: a checkbox whose ``with`` block is an accordion."""

    def __enter__(self):
        self.accordion = gr.Accordion(self.label, open=False)
        self.accordion.__enter__()
        return self

    def __exit__(self, *exc):
        self.accordion.__exit__(*exc)


def choice_values(component) -> list | None:
    """gradio 3 keeps a dropdown's choices as values, gradio 4 as (label, value) pairs."""
    choices = getattr(component, "choices", None)
    return None if choices is None else [c[1] if isinstance(c, (tuple, list)) else c for c in choices]


with gr.Blocks(title="OMG multi-concept") as page:
    prompt = gr.Textbox(label="Prompt", value="a man and a woman hugging on a beach")
    # served: a plain open accordion (gradio 4 has no front end for a component subclass such as EnableAccordion)
    accordion = (lambda label: gr.Accordion(label, open=True, elem_id="omg")) if SERVE else (lambda label: EnableAccordion(False, label=label))
    components, infotext = ui.build(accordion, lambda: ["char1", "char2"],
                                    lambda dropdown, n: None, prompt_box=prompt)
if SERVE:
    page.queue().launch(server_name="127.0.0.1", server_port=int(sys.argv[2]), prevent_thread_lock=False)
    sys.exit(0)
names = {id(component): name for component, name in infotext}
print(json.dumps({"gradio": gr.__version__, "components": [
    {"kind": type(c).__name__, "value": c.value, "choices": choice_values(c), "infotext": names.get(id(c))}
    for c in components]}))
