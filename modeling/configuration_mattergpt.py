"""Configuration of MatterGPT, the conditional GPT decoder of the SLICES-PLUS paper.

Sizes follow GPT-2's names (``n_layer``, ``n_head``, ``n_embd``, ``n_inner``); the defaults are the
paper's hyper-parameters (8 layers, 8 heads, 512 embedding, 2,048 feed-forward, dropout 0.1).

Conditions:

- crystal system: an integer in ``[0, num_crystal_systems)`` (0 cubic, 1 hexagonal, 2 trigonal,
  3 tetragonal, 4 orthorhombic, 5 monoclinic, 6 triclinic), or -1 for "no condition";
- properties: one float per name in ``property_names`` (units as in the data, e.g. eV/atom for
  ``formation_energy_per_atom``, eV for ``band_gap``, GPa for moduli) plus a 0/1 mask; a masked property
  is "no condition". Values are standardised with ``property_means`` / ``property_stds`` (same units)
  before the embedding, so those statistics travel with the checkpoint.
"""


from huggingface_hub.dataclasses import strict

from .configuration_base import CrystalTransformerConfig

PROPERTY_EMBEDDINGS: tuple[str, ...] = ("gaussian", "linear")


@strict
class MatterGPTConfig(CrystalTransformerConfig):
    r"""
    The fields of `CrystalTransformerConfig` (sizes, dropout, special ids), with the paper's sizes as
    defaults; ``n_positions`` counts learned absolute positions and ``n_layer`` blocks **per flow**. Plus:
    num_crystal_systems (`int`): number of crystal-system classes (7); id -1 means unconditioned.
    property_names (`tuple[str, ...]`): names of the scalar property conditions, in tensor order.
    property_means / property_stds (`tuple[float, ...]`): per-property normalisation statistics (data units).
    property_embedding (`str`): ``"gaussian"`` (Con-CDVAE-style radial-basis expansion of the standardised
        value followed by a linear map) or ``"linear"`` (a linear map of the standardised value).
    num_gaussians (`int`): number of Gaussian basis functions per property.
    gaussian_range (`float`): basis centres span ``[-gaussian_range, gaussian_range]`` standard deviations.
    dual_flow (`bool`): two block stacks (crystal-system flow and property flow) merged by a projection;
        ``False`` gives one stack that receives both conditions.
    condition_dropout (`float`): training-time probability of replacing each condition, independently per
        example, by its learned "no condition" embedding (classifier-free-guidance-style training).
    """

    model_type = "mattergpt"
    attribute_map = {
        "hidden_size": "n_embd",
        "max_position_embeddings": "n_positions",
        "num_attention_heads": "n_head",
    }

    vocab_size: int = 128
    n_embd: int = 512
    n_layer: int = 8
    n_head: int = 8
    n_inner: int = 2048
    num_crystal_systems: int = 7
    property_names: list[str] | tuple[str, ...] = ("formation_energy_per_atom",)
    property_means: list[float] | tuple[float, ...] = (0.0,)
    property_stds: list[float] | tuple[float, ...] = (1.0,)
    property_embedding: str = "gaussian"
    num_gaussians: int = 32
    gaussian_range: float = 3.0
    dual_flow: bool = True
    condition_dropout: float = 0.1
    use_cache: bool = True

    @property
    def num_flows(self) -> int:
        """Number of parallel block stacks (2 for dual flow, 1 otherwise)."""
        return 2 if self.dual_flow else 1

    @property
    def num_hidden_layers(self) -> int:
        """Attention layers in the whole model (all flows): the number of KV-cache layers."""
        return self.n_layer * self.num_flows

    @property
    def num_properties(self) -> int:
        """Number of scalar property conditions."""
        return len(self.property_names)

    def validate_mattergpt_properties(self) -> None:
        """Check that the property statistics match the property names and can standardise."""
        n = len(self.property_names)
        if len(self.property_means) != n or len(self.property_stds) != n:
            raise ValueError(
                f"property_means ({len(self.property_means)}) and property_stds ({len(self.property_stds)}) "
                f"must have one entry per property name ({n}: {list(self.property_names)})."
            )
        if any(s <= 0 for s in self.property_stds):
            raise ValueError(f"property_stds must be positive, got {list(self.property_stds)}.")
        if self.property_embedding not in PROPERTY_EMBEDDINGS:
            raise ValueError(f"property_embedding must be one of {PROPERTY_EMBEDDINGS}, got {self.property_embedding!r}.")
        if not 0.0 <= self.condition_dropout < 1.0:
            raise ValueError(f"condition_dropout must be in [0, 1), got {self.condition_dropout}.")


MatterGPTConfig.register_for_auto_class()

__all__ = ["MatterGPTConfig"]
