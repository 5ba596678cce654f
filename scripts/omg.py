"""The WebUI Script: the OMG accordion in txt2img, wired to the engine through the host adapter."""
from modules import scripts
from modules.processing import StableDiffusionProcessingTxt2Img
from modules.ui_components import InputAccordion

from omg_ext import ui
from omg_ext.config import OmgConfigError, from_args
from omg_ext.hosts.a1111 import A1111Generation, OmgUserError, fail_job, lora_names


class OmgScript(scripts.Script):
    section = "accordions"
    create_group = False

    def title(self):
        return "OMG multi-concept"

    def show(self, is_img2img):
        return scripts.AlwaysVisible if not is_img2img else False

    def ui(self, is_img2img):
        components, self.infotext_fields = ui.build(lambda label: InputAccordion(False, label=label, elem_id="omg"), lora_names)
        self.paste_field_names = [name for _, name in self.infotext_fields]
        return components

    def process(self, p, *args):
        """Parse and check the settings; a bad one fails the job with its message (A1111 would
        only log an exception raised here and generate anyway)."""
        try:
            cfg = from_args(args)
            if not cfg.enabled:
                return
            if not isinstance(p, StableDiffusionProcessingTxt2Img):
                raise OmgUserError("OMG works in txt2img only")
            cfg.validate(p.prompt if isinstance(p.prompt, str) else p.prompt[0])
        except (OmgConfigError, OmgUserError) as e:
            fail_job(p, str(e))
            return
        p._omg = A1111Generation(p, cfg)
        p._omg.attach()

    def postprocess(self, p, processed, *args):
        generation = getattr(p, "_omg", None)
        if generation is None:
            return
        for layout, masks in generation.layout_images:
            processed.images += [layout, masks]
            processed.infotexts += [processed.infotexts[0]] * 2

