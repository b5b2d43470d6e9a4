from .layer_decay import LayerDecayOptimWrapperConstructor, layer_depth_by_name

__all__ = ['LayerDecayOptimWrapperConstructor', 'layer_depth_by_name']
