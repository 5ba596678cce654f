"""The WebUI Script: the OMG accordion in txt2img and img2img, wired to the engine through the host adapter."""
from modules import script_callbacks, scripts, ui_common
from modules.processing import StableDiffusionProcessingImg2Img, StableDiffusionProcessingTxt2Img
from modules.ui_components import InputAccordion

from omg_ext import ui
from omg_ext.config import MAX_CONCEPTS, OmgConfigError, from_args, with_overrides
from omg_ext.hosts import running_forge
from omg_ext.hosts.mask_models import free_mask_models, model_files_status
from omg_ext.masks.regions import regions_from_image
from omg_ext.hosts.a1111 import A1111Generation
from omg_ext.hosts.errors import OmgUserError
from omg_ext.hosts.host_api import fail_job
from omg_ext.hosts.loras import lora_names, lora_trigger_words, refresh_loras
from omg_ext.hosts import extract_ui, merge_ui
from omg_ext.hosts.concepts_tab import concepts_tab
from omg_ext.hosts.webui_settings import add_settings, add_xyz_axes, save_layout_images

if running_forge():
    from omg_ext.hosts.forge import ForgeGeneration as Generation
else:
    Generation = A1111Generation


class OmgScript(scripts.Script):
    section = "accordions"
    create_group = False

    def title(self):
        return "OMG multi-concept"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def after_component(self, component, **kwargs):
        """Keep the tab's prompt box: picking a concept's LoRA prefills its prompt from it."""
        if kwargs.get("elem_id") == f"{self.tab()}_prompt":
            self.prompt_box = component

    def tab(self) -> str:
        return "img2img" if self.is_img2img else "txt2img"

    def ui(self, is_img2img):
        tab = self.tab()
        prefix = "omg" if tab == "txt2img" else f"omg_{tab}"

        def refresh_button(dropdown, n):
            ui_common.create_refresh_button(dropdown, refresh_loras, lambda: {"choices": ["", *lora_names()]}, f"{prefix}_lora_refresh_{n}")

        components, self.infotext_fields = ui.build(
            lambda label: InputAccordion(False, label=label, elem_id=prefix), lora_names, refresh_button,
            prompt_box=getattr(self, "prompt_box", None), trigger_words=lora_trigger_words,
            image_to_regions=lambda image: regions_from_image(image, MAX_CONCEPTS), free_models=free_mask_models,
            model_status=model_files_status, tab=tab)
        self.paste_field_names = [name for _, name in self.infotext_fields]
        return components

    def process(self, p, *args):
        """Parse and check the settings; a bad one fails the job with its message (A1111 would
        only log an exception raised here and generate anyway)."""
        try:
            cfg = with_overrides(from_args(args), getattr(p, "omg_xyz", {}))
            if not cfg.enabled:
                return
            if not isinstance(p, (StableDiffusionProcessingTxt2Img, StableDiffusionProcessingImg2Img)):
                raise OmgUserError("OMG works in txt2img and img2img only")
            cfg.validate()
            p._omg = Generation(p, cfg)
        except (OmgConfigError, OmgUserError) as e:
            fail_job(p, str(e))
            return
        p._omg.attach()

    def process_before_every_sampling(self, p, *args, **kwargs):
        """Forge rebuilds its UNet patcher before every sampling: patch the new one."""
        patch_unet = getattr(getattr(p, "_omg", None), "patch_unet", None)
        if patch_unet is not None:
            patch_unet()

    def postprocess_batch(self, p, *args, images=None, **kwargs):
        """The batch's images, decoded by the host: OMG draws its masks over them (no decode of its own)."""
        generation = getattr(p, "_omg", None)
        if generation is not None and images is not None:
            generation.keep_pictures(images)

    def postprocess(self, p, processed, *args):
        generation = getattr(p, "_omg", None)
        if generation is None:
            return
        save_layout_images(p, generation, processed.infotexts[0])
        for pictures in generation.layout_images:
            processed.images += [image for image, _ in pictures]
            processed.infotexts += [processed.infotexts[0]] * len(pictures)


script_callbacks.on_before_ui(add_xyz_axes)
script_callbacks.on_ui_settings(add_settings)
script_callbacks.on_ui_tabs(concepts_tab())
script_callbacks.on_app_started(extract_ui.add_route)
script_callbacks.on_app_started(merge_ui.add_route)
